"""`python -m data.generate ...`: synthetic impression logs as Parquet (the CLI name; the
generators live in `data/generators/`: `logs.py` writes the files and holds the
KuaiRand-shaped kind, `clusters.py` the kind where expert capacity binds).
"""

from data.generators.logs import main

if __name__ == "__main__":
    main()
