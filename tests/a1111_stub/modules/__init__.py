"""Stand-in for the parts of AUTOMATIC1111 stable-diffusion-webui 1.10.1's ``modules`` package
that lora_dreambooth.host uses. Only the host tests put this folder on ``sys.path``.

Each file mirrors what A1111 1.10.1 does for the names we call (written from reading its
source, not copied); everything else of A1111 is absent on purpose, so a host import of
anything not mirrored here fails loudly in the tests.
"""
