from drivers.echo import main

main()
