import sys

if len(sys.argv) > 2 and sys.argv[1] == "exec" and sys.argv[2] not in ("-h", "--help"):
    from libos.protocol import exec_main  # the fast path: no click, no filesystem stack

    exec_main(sys.argv[2:])
else:
    from libos.cli import main

    main()
