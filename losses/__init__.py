from losses.lejepa import LeJEPALoss, lejepa_loss
from losses.sigreg import SIGReg, epps_pulley, random_directions

__all__ = ["SIGReg", "epps_pulley", "random_directions", "lejepa_loss", "LeJEPALoss"]
