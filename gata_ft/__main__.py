from gata_ft.cli import main

main()
