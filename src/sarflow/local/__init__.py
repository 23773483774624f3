"""The product on one machine: services mode (real servers on 127.0.0.1 standing in for the
cluster), the demo and the results on top of it."""
