-- One series' raw samples without reading every series' rows of the span: a second
-- BRIN, on series_id. Rows arrive in agent batches, and a host's series ids are
-- allocated together, so a few pages hold a few hosts' id ranges; the multi-minmax
-- operator class keeps several intervals per range (a plain minmax would span from the
-- lowest to the highest host on the pages). Two pages per range keeps it selective; it
-- stays about 0.5 % of the table. The collector summarizes new ranges every few seconds
-- (autosummarize alone lags up to a minute), so a history's raw tail reads only the
-- pages of its host. New daily partitions get it from the parent.
CREATE INDEX samples_series ON samples
    USING brin (series_id int8_minmax_multi_ops) WITH (pages_per_range = 2, autosummarize = on);
