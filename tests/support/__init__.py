"""What the tests share besides fixtures: the numpy oracle, Keras-made checkpoints, servers.

Imported as ``from support.x import ...`` (pyproject puts tests/ on pytest's ``pythonpath``);
fixtures stay in tests/conftest.py, which imports from here, never the other way round.
No module here may share a name with an installed package (``orbax``, ``keras``...):
safety.py and orbax_keras_job.py also run as scripts, with this folder first on their path.
"""
