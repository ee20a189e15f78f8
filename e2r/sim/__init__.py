"""The synthetic racing world: random closed tracks, an expert driver and the car's two sensors.

Modules (import them directly; this package imports none of them eagerly):

- ``e2r.sim.track``    closed race tracks: centre line, walls, barrels, ground paint
- ``e2r.sim.vehicle``  the one vehicle model (kinematic bicycle, steering-rate/acceleration limits, speed loop)
- ``e2r.sim.expert``   the expert driver (pure pursuit + curvature-limited speed), driving the vehicle model
- ``e2r.sim.sensors``  the LiDAR and the front camera, ray cast against the same scene
- ``e2r.sim.appearance``  the sensor gap's camera side: per-track look (light, exposure, shadows, materials,
  worn paint), motion blur and sensor noise; ``e2r.sim.materials`` the surfaces' colours and LiDAR intensities
- ``e2r.sim.traffic``  other cars driving the track (boxes on a time schedule), their geometry and contact
- ``e2r.sim.world``    the world written as a dataset in the docs/CONTRACTS.md layout (``generate_dataset``)
- ``e2r.sim.closed_loop``  B cars driven by a policy on a recorded track, sensors rendered per step; laps,
  collisions, metrics
- ``e2r.sim.policies`` closed-loop policies: expert, teacher / student checkpoints, baselines
- ``e2r.sim.drive``    closed-loop evaluation of several policies on a split (``pipelines.drive``), and
  ``e2r.sim.drive_plots`` its trajectory PNG and GIF
- ``e2r.sim.preview``  a preview PNG of one recorded frame (LiDAR BEV, camera, projected points)
- ``e2r.sim.tiny``     tiny fake datasets in the same layout (random points and images), for tests and
  benchmarks
"""
