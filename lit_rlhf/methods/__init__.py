"""One LightningModule per method, each borrowing its networks from the AdapterBank."""

from lit_rlhf.methods.base import BankMethod
from lit_rlhf.methods.dpo import CPO, DPO, PreferenceMethod, SimPO
from lit_rlhf.methods.export import ExportOnFitEnd

__all__ = ["BankMethod", "CPO", "DPO", "ExportOnFitEnd", "PreferenceMethod", "SimPO"]
