from autoprec.cli import run

run()
