"""A small character-level GPT trained through the disttrain app with its own config files.

    torchrun --standalone --nproc_per_node=2 -m disttrain --config-dir examples/char_gpt/conf \\
        experiment=char_gpt strategy=ddp

Only ``strategy=`` changes to train it with ``fsdp``, ``parameter_server`` or ``model_parallel``.
See docs/your_model.md.
"""
