"""``python -m debias_ops.recipe ...``: the same as the ``debias-ops-train`` command."""
from debias_ops.recipe.cli import entry

if __name__ == "__main__":
    entry()
