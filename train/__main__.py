"""``python -m atac_train COMMAND [ARGS]``: the console scripts without their launchers."""

from atac_train import cli

if __name__ == "__main__":
  cli.main()
