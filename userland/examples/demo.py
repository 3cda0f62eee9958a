"""`make demo`: boot llmos on a temporary home, run the example program, train a
BPE tokenizer and a small Llama on the standard library's sources, generate from
it, export it and load the export with transformers, deploy it behind `llmos serve`
and ask it through the OpenAI API with the official client, shut it down.

Uses the same `llmos` command a person would, so what it prints is what they see.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLMOS = [sys.executable, "-m", "userland.cli"]
# a Llama of 3.9M parameters: 4 layers, width 192, 4 heads, a 4096-token BPE
# vocabulary, 128-token windows; 250 steps of 2 workers x 12 windows (about two
# minutes on 2 cores, docs/executor.md)
LLAMA = ["--arch", "llama", "--tokenizer", "/models/pyllama", "--layers", "4",
         "--heads", "4", "--width", "192", "--steps", "250"]
CHECK = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
tok = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
ids = tok("def main(", return_tensors="pt").input_ids
out = model.generate(ids, do_sample=False, max_new_tokens=40, pad_token_id=tok.pad_token_id)
n = sum(p.numel() for p in model.parameters())
print(f"transformers loads it: {type(model).__name__}, {n / 1e6:.1f}M parameters; greedy:")
print(tok.decode(out[0], skip_special_tokens=True))
"""


def llmos(*args: str) -> str:
    print(f"\n$ llmos {' '.join(args)}", flush=True)
    out = subprocess.run([*LLMOS, *args], check=True, stdout=subprocess.PIPE, text=True).stdout
    print(out, end="", flush=True)
    return out


ASK = """
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none")
for chunk in client.completions.create(model="pyllama", prompt="def main(", max_tokens=60,
                                       temperature=0, stream=True):
    print(chunk.choices[0].text if chunk.choices else "", end="", flush=True)
print()
"""


def serve_demo() -> None:
    """Deploy the model, serve it, ask it as any OpenAI client would."""
    llmos("deploy", "/models/pyllama", "--name", "pyllama", "--max", "2")
    url = llmos("serve", "-d", "--port", "0").split()[-1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = subprocess.run([*LLMOS, "deployments", "--json"], check=True, text=True,
                             stdout=subprocess.PIPE).stdout
        if json.loads(got)[0]["running"]:
            break
        time.sleep(0.5)
    print(f"\n$ python -c 'openai.OpenAI(base_url=\"{url}/v1\").completions.create("
          f"model=\"pyllama\", stream=True, ...)'", flush=True)
    subprocess.run([sys.executable, "-c", ASK, url], check=True)
    llmos("deployments")


def main() -> int:
    home = tempfile.mkdtemp(prefix="llmos-demo-", dir="/tmp")
    os.environ["LLMOS_HOME"] = home
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    export = os.path.join(home, "export", "pyllama")
    try:
        llmos("start")
        try:
            llmos("run", "python", str(HERE / "hello.py"))
            llmos("corpus", "/datasets/pystdlib")       # the stdlib's sources, as bytes
            llmos("tokenizer", "train", "/datasets/pystdlib", "/models/pyllama",
                  "--vocab", "4096")
            llmos("train", "pyllama", "--data", "/datasets/pystdlib", *LLAMA)
            llmos("infer", "/models/pyllama", "def main(", "-n", "120", "-v", "--seed", "1")
            llmos("export", "/models/pyllama", export)
            print(f"\n$ python -c '...from_pretrained({export!r})...'", flush=True)
            subprocess.run([sys.executable, "-c", CHECK, export], check=True)
            serve_demo()
            llmos("jobs", "-a")                              # the job, ended: its loss, checkpoint
            llmos("models")
            llmos("ps")
            llmos("status")
        finally:
            llmos("stop")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
