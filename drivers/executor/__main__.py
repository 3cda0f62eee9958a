from drivers.executor import main

main()
