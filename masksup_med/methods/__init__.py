"""The training methods, one module each (``masksup``, ``maskmatch``, ``pretraining``), their losses,
the EMA teacher, class-wise masked image modelling and method-agnostic engine handlers."""
