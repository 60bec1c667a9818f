from libos.cli import main

main()
