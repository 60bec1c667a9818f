from occlumfs.cli import main

main(prog_name="occlumfs")
