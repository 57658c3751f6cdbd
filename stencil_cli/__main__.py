"""Allow `python -m stencil_cli` (used by `accelerate launch -m stencil_cli ...`)."""

from stencil_cli.cli import app

if __name__ == "__main__":
    app(prog_name="stencil")
