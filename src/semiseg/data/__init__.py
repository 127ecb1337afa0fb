"""Datasets, splits, augmentation and the DataModule."""

import cv2

# OpenCV's own thread pool would compete with the training process for the cores, and calling
# setNumThreads inside a forked DataLoader worker can deadlock: set it once, before any fork.
cv2.setNumThreads(1)
