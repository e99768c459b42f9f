"""Pure, jittable operations of the classic pretext tasks (issue 15): rotations, jigsaw tiles and permutation
sets, context-prediction patch pairs, inpainting regions, CIE Lab colour and its quantised ab bins, and label
propagation through an attention over frame embeddings. The methods in ``sslx.methods`` build their inputs
and targets with them on the device, inside ``loss_fn``, from the plain augmented image.
"""
