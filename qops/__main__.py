from qops.cli.main import main

main()
