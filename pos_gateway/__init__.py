"""The POS gateway: the gRPC PosService that terminals and pharmacy software call.

`service` routes each request to its person's clearing worker (after the ingress checks of
clearing/ingress.py) and translates the reply; `security` is the terminal security on
that path (request and reply MACs, chip cryptograms, PIN blocks) through the HSM.
"""
