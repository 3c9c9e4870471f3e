"""pytorchexample: Flower's quickstart-pytorch app, as FedAvg and as Clip21."""
