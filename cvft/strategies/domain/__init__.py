"""Domain adaptation with unlabelled target-domain images: AdaBN and pseudo-label self-training.

* :func:`adabn`, :class:`AdaBNCallback` and the strategy ``adabn`` re-estimate BatchNorm statistics on the target
  domain (Li et al., 2016).
* The objective ``pseudo_label`` adds a cross-entropy on confidently pseudo-labelled target images (Lee, 2013).

Both read a folder of target images with the backbone's preprocessing (:mod:`cvft.strategies.domain.target`).
"""

from cvft.strategies.domain.adabn import AdaBN, AdaBNCallback, adabn
from cvft.strategies.domain.pseudo_label import PseudoLabel
from cvft.strategies.domain.target import CyclingBatchSampler, target_dataset, target_loader

__all__ = ["adabn", "AdaBN", "AdaBNCallback", "PseudoLabel", "target_dataset", "target_loader", "CyclingBatchSampler"]
