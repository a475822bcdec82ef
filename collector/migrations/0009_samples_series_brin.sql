-- One series' raw samples without reading every series' rows of the span: a second
-- BRIN, on series_id. Rows arrive in agent batches, and a host's series ids are
-- allocated together, so a few pages hold a few hosts' id ranges; the multi-minmax
-- operator class keeps several intervals per range (a plain minmax would span from the
-- lowest to the highest host on the pages). Two pages per range keeps it selective; it
-- stays about 0.5 % of the table. New daily partitions get it from the parent.
--
-- Summarizing a range reads its rows again, about a fifth of what writing them cost, so
-- it is done on demand: while someone reads history, the collector summarizes new ranges
-- every few seconds; otherwise only vacuum does. No autosummarize: with two pages per
-- range it would queue more requests than autovacuum keeps and log each one it drops.
CREATE INDEX samples_series ON samples
    USING brin (series_id int8_minmax_multi_ops) WITH (pages_per_range = 2);
