"""Flower's quickstart-pytorch app converted to Clip21 (the README's diff from ``pytorchexample/fedavg``).

The client's train handler gets ``clip21_mod`` (it sends only the clipped
increment clip_tau(x - y - v_i) and keeps its memory v_i in the node's state);
the server runs ``Clip21Strategy`` with run config ``tau`` instead of FedAvg.
"""
