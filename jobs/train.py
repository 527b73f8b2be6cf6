"""`ray job submit --working-dir . -- python jobs/train.py <cffa train flags>`"""
import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ on sys.path; the package sits beside it in the uploaded working dir.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cffa_ray.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]])
