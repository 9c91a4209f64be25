"""`resident`: every routed expert on the device (budget 100%), no transfers during the run."""

from expertmap.predictor.policies.base import Policy


class Resident(Policy):
    name = "resident"
    all_resident = True
