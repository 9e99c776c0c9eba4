from leafe.cli import main

main()
