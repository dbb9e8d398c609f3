"""The PyTorch implementation of the L-Softmax op (`torch.autograd.Function`)."""
