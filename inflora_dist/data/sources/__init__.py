"""The sources `python -m inflora_dist.data.build_shards` reads, one module each; build_shards holds the CLI and
the writing of shards, index and task sequence.

* fashion_mnist: Fashion-MNIST's IDX files (`fashion-mnist`)
* arrays: .npy image and label arrays (`arrays`)
* image_folder: one sub-folder of images per class (`imagefolder`)
* records: prompt/response records from JSON Lines, Parquet, CSV or a saved dataset (`records`, `jsonl`)

The benchmark and packaged-text sources have their own modules in inflora_dist.data: olora (`olora`), superni
(`superni`) and instruction_sources (`llm-demo`).
"""
