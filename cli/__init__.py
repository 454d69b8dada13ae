

def run_this_checkout() -> None:
    """`rlhf` run inside a copy of this repository other than the one it was installed from runs that copy's code.

    `make setup` installs the project editable (`pip install -e .`): the `rlhf` script imports the checkout it
    was installed from. DVC runs queued and temporary experiments (`dvc exp run --queue`, `rlhf seeds run`)
    in copies of the repository under .dvc/tmp/exps, and records in their dvc.lock the hashes of the copy's
    code; without this, their stages would run the installing checkout's code instead, edited meanwhile
    perhaps, and the lineage would lie. So when the working directory (or a folder above it) is another
    checkout of this project, the command is executed again as `python -m cli` with that checkout first
    on the import path. Only the console script does this, never an import of the package.
    """
    import os
    import sys
    from pathlib import Path

    if Path(sys.argv[0]).name != "rlhf":
        return
    here = Path(__file__).resolve().parents[1]
    cwd = Path.cwd().resolve()
    root = next((d for d in (cwd, *cwd.parents)
                 if (d / "cli" / "__init__.py").is_file() and (d / "stages").is_dir() and (d / "rlhf").is_dir()), None)
    if root is None or root == here or os.environ.get("RLHF_CHECKOUT") == str(root):
        return
    path = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "RLHF_CHECKOUT": str(root), "PYTHONPATH": path}
    os.execve(sys.executable, [sys.executable, "-m", "cli", *sys.argv[1:]], env)


run_this_checkout()
