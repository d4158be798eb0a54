"""Triton kernels: the ``triton`` backend of fastbert's ops (see fastbert.backends).

Each op the backend implements is exposed here under the op's name with the signature of its
reference in ``fastbert.reference``; ops not exposed run on the next backend.
"""
