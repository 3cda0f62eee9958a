from drivers.devices import main

main()
