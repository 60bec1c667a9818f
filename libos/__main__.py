from libos.entry import main

main()
