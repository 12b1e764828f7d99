from difftilt.core.testing import DomainContract


class TestToyDomainContract(DomainContract):
    plugin = "toy"
    process_spec = {"name": "mixture", "num_steps": 4}
    reward_spec = {"name": "linear", "weights": [1.0, 0.0]}


class TestToyDomainContractQuadratic(DomainContract):
    plugin = "toy"
    process_spec = {"name": "mixture", "num_steps": 3, "eta": 1.0}
    reward_spec = {"name": "quadratic", "center": [0.0, 1.0], "precision": 2.0}
