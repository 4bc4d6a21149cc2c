from vmtrim.cli import main

main()
