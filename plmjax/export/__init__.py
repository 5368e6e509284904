"""Hugging Face interop: `plmjax export` (workdir -> transformers directory) and
`plmjax import-hf` (transformers BERT/GPT-2/T5 directory -> workdir).

  hf_weights    param tree <-> PyTorch state dict (names, transposes, tied weights)
  hf_config     ModelConfig <-> config.json
  hf_tokenizer  sentencepiece -> tokenizer.json; HF tokenizer files carried in
  export        the `export` command
  import_hf     the `import-hf` command
"""
