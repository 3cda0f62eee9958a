from drivers.tensorfs import main

main()
