"""The distributed shell: Ray actors around the Reptile core (adapt workers, a parameter server,
an evaluator) and the driver that starts and watches them."""
