"""The parallel decoders, one module per decoding family; each registers its decoders with the
engine's registry (``inference/engine.py``) when imported. ``leaplm.inference`` imports this
package, so every decoder is registered wherever the engine is used.

- ``jacobi``: Jacobi decoding, one block or several (``jacobi``, ``jacobi_multiblock``)
- ``block_diffusion``: block-parallel denoising of a block-diffusion model (``block_diffusion``)
- ``tree``: draft heads verified as a sparse tree (``medusa``, ``hydra``)
- ``eagle3``: an EAGLE-3 draft's tree, verified the same way (``eagle3``)
- ``kangaroo``: the target's own first layers and an adapter draft, its other layers verify (``kangaroo``)
- ``speculative``: a draft model, fixed or adaptive draft length (``speculative``)
- ``prompt_lookup``: Hugging Face's prompt lookup decoding, the training-free peer (``hf_prompt_lookup``)
"""

from leaplm.inference.decoders import block_diffusion, eagle3, jacobi, kangaroo, prompt_lookup, speculative, tree

__all__ = ["block_diffusion", "eagle3", "jacobi", "kangaroo", "prompt_lookup", "speculative", "tree"]
