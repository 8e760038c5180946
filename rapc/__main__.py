from rapc.cli import main

main(prog_name="rapc")
