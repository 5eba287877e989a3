"""Pre-trained block pools cut from timm models (manifest + safetensors).

Filled in by the pools issue; it knows nothing of MPI or FL and imports no other fedemu package.
"""
