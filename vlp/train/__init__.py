"""The training core pretraining, finetuning and evaluation share; importable without Ray.

One module per concern: ``seeds`` (every seed from the root seed), ``precision`` (autocast, loss scaling),
``device``, ``optim`` (the optimizer config, parameter groups, AdamW, warmup/decay), ``metrics``
(accumulating named model outputs over batches and workers), ``evaluate`` (batches of a task split and the
evaluation pass), ``pretrain_model`` (the pretraining model: encoder + objective heads), ``validate``
(pretraining validation and zero-shot retrieval), ``checkpoints`` (the pretrained and finetuned model
formats) and ``runtime`` (the config of threads, precision and missing images).
"""
