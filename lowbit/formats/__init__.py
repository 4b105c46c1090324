"""The quantized checkpoints' bit layouts: AutoAWQ's GEMM (`awq_format`) and AutoGPTQ's
(`gptq_format`), as pure tensor packing and unpacking; compressed-tensors' 8-bit schemes
(`compressed_tensors`: the config we write and the schemes we read). A room of its own below layers, imports
nothing from lowbit but errors: layers unpack with it, quant and the dummy-weight builder pack with
it, and a kernel may read the layout too, none of them needing the loader."""
