"""The Stencil method: attention masks, the masked fine-tune, inversion, Context Guidance, prompts,
weight files, export and evaluation. Tensors, pipelines and dataclasses: no store, no flags, no printing."""
