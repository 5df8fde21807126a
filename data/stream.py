"""`python -m data.stream vocab|stats ...`: the files a streaming source reads instead of a
full pass (vocabularies, dense statistics); see `data/parsing/prepare.py`. The source
itself is `data/sources/parquet_stream.py`; the loader's throughput benchmark, formerly
`python -m data.stream bench`, is `python -m benchmarks.stream_loader`.
"""

from data.parsing.prepare import main

if __name__ == "__main__":
    main()
