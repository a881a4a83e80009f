"""The diffusers integration: the NaLa DiT transformer, its attention processors and options, layer
swapping, conversion from a softmax DiT, loading, attention sharpness and norm-awareness tools.
"""
