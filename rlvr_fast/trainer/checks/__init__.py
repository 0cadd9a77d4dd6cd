"""What is checked before the model loads: the config, the data, the output folder and resume (``preflight``), and what
the config asks of the machine (``capacity``)."""
