from losses.lejepa import LeJEPALoss, lejepa_loss
from losses.monitor import MONITOR_TAGS, monitor_figures, rankme
from losses.sigreg import SIGReg, epps_pulley, random_directions

__all__ = ["SIGReg", "epps_pulley", "random_directions", "lejepa_loss", "LeJEPALoss", "MONITOR_TAGS", "monitor_figures",
           "rankme"]
