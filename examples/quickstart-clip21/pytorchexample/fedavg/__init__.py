"""Flower's quickstart-pytorch app as it is: a ClientApp that trains, and FedAvg.

``pytorchexample/clip21`` is the same app converted to Clip21;
``diff -ru pytorchexample/fedavg pytorchexample/clip21`` is the diff in the
README's section "Adding Clip21 to an existing Flower app".
"""
